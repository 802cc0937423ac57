"""Generate text with a GPT exported by `dtrain ckpt export RUN_DIR --out gpt.safetensors`.

    python examples/generate.py gpt.safetensors --config examples/gpt.toml --prompt "The with statement"
    python examples/generate.py gpt.safetensors --run-dir runs/gpt   # the options the run recorded
"""

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from dtrain.config import load_config
from dtrain.examples import gpt
from dtrain.snapshot import catalog

p = argparse.ArgumentParser()
p.add_argument("weights")
p.add_argument("--config", help="the run's TOML")
p.add_argument("--run-dir", help="or the run dir: the options recorded in its newest snapshot")
p.add_argument("--prompt", default="The with statement")
p.add_argument("--tokens", type=int, default=300)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
if args.run_dir:
    storage, step = catalog.resolve(Path(args.run_dir))
    options = catalog.read_manifest(storage, step or catalog.newest_step(storage)).config["task"]["options"]
else:
    options = load_config(args.config).task.options
model = gpt.build_model(options)
weights = load_file(args.weights)
head = weights.setdefault("head.weight", weights["tok_emb.weight"])  # a file may hold a tied weight once
assert torch.equal(head, weights["tok_emb.weight"]), "head.weight differs from tok_emb.weight: not this model"
model.load_state_dict(weights, strict=True)  # every name matched; both names fill the one tied parameter
assert model.head.weight is model.tok_emb.weight, "the output head is no longer tied to the embedding"
out = gpt.generate(model, gpt.encode(args.prompt)[None], args.tokens, generator=torch.Generator().manual_seed(args.seed))
print(gpt.decode(out[0]))
