"""The side-by-side benchmark (issue #5): make bench; see docs/performance.md."""
