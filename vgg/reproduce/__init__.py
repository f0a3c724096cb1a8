"""The paper's whole protocol as one resumable plan (`python reproduce.py`): the twelve training runs and
the evaluations of Tables 3-6 as data (plan.py), running them (stages.py), and the report (report.py).

May import: every other part (it sits on top, under the command lines only).
"""
