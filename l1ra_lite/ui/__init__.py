"""What the user sees: it reads events and run folders, and never drives training.

dashboard.py    the live screen (or plain log lines) while `finetune` runs
inspect.py      where did the rank go (`l1ra-lite inspect`)
rank_views.py   totals by module type and layer, and the heat map, shared by both
"""
