.PHONY: test demo lint bench bench-quick

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

lint:
	.venv/bin/ruff check .
	.venv/bin/mypy

bench:
	bash scripts/bench.sh

bench-quick:
	bash scripts/bench.sh --quick
