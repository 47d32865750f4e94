"""Commands: the CLI (``cli.py`` parses every command's options without loading torch) and the jobs it runs
(train and export through ``training``/``distributed``; evaluate, report, sweep, demo, plan, pretrain-base,
prompts, toy here). The top layer: it may import anything, nothing imports it.
"""
