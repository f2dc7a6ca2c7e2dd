"""Speed and memory benchmarks of the ACE-Step pack; results are committed under bench/results/."""
