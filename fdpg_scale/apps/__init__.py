"""Commands: the CLI and what it delegates to (evaluate, report, sweep, demo, plan, pretrain-base,
prompts). The top layer: it may import anything, nothing imports it.
"""
