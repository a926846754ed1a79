"""The plan layer: the Mélange ILP, its certificate check, baselines, and plans as data or tables.

`problem` states the instance and the rules of a plan, `solver` finds the cheapest certified plan
(`instance` lays the problem out as arrays, `highs` calls the solver, `floors` gives the plans found
without search), `certify` checks a plan against its problem alone, `report` renders it.
"""
