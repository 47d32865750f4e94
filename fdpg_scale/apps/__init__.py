"""Commands: the CLI (``cli.py`` parses every command's options without loading torch) and the jobs it runs
(train and export through ``training``/``distributed``; evaluate, report, demo, plan, pretrain-base, prompts,
toy here; reproduce and sweep run ``fdpg_scale.experiments``, which shares this top layer). The top layer: it
may import anything, nothing below imports it.
"""
