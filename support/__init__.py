"""Helpers the tests, the crash harness and the benchmarks share: starting, finding and killing the
processes of a run. Not part of the dtrain package."""
