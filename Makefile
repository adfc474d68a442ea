.PHONY: test demo lint bench bench-quick bench-publish

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

lint:
	.venv/bin/ruff check .
	.venv/bin/mypy

# The full fair set; prints the table and issue 13's goals, met or not.
# Results go to bench/results/local/ (git-ignored); bench-publish writes bench/results/full.*.
bench:
	bash scripts/bench.sh

bench-quick:
	bash scripts/bench.sh --quick

bench-publish:
	bash scripts/bench.sh --publish
