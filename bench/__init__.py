"""The benchmarks behind `make bench`; see bench/README.md."""
