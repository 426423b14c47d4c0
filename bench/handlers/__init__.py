"""The handlers the benchmarks run, deployed to Lambent from these files and imported as-is by
the baseline app, so both sides run the same code."""
