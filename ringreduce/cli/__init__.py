"""Command-line tools: ringreduce-bench, ringreduce-run and the kernel bench."""
