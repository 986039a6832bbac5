"""The library's workbench, internal: real data that ships with packages, the small models,
the training loops, timing and reports that the demo, the tests, the benchmarks and the
examples share. Not public API: it changes with them."""
