"""Automatic scale-invariance detection: which weights can be scaled without changing the loss.

Li & Arora's equivalence (weight decay + SGD == exponential LR without weight decay) holds only for parameter
sets W with L(c W) = L(W) for every c > 0. This package finds those sets from the traced graph, never from layer
names, and then confirms each one numerically:

  graph.py      torch.fx trace -> a degree label per tensor; norm layers absorb their input (the rules)
  unionfind.py  joint sets: roots merged where a sum (residual add, cat, bias) needs them to scale together
  numeric.py    scale each set by c, compare train-mode outputs with the norms' eps compensated
  report.py     InvarianceReport: every parameter, its set, its group, and why
  find.py       find_scale_invariant: the steps above, in order
  groups.py     param_groups (ExpSGD's groups from the report) and running_stats_rescaler (BN hook on renorm)
"""
from bigexp.optim.invariance.find import find_scale_invariant
from bigexp.optim.invariance.groups import param_groups, running_stats_rescaler
from bigexp.optim.invariance.report import InvarianceReport, NormUse, ParamEntry, ParamSet

__all__ = ["find_scale_invariant", "param_groups", "running_stats_rescaler", "InvarianceReport", "NormUse",
           "ParamEntry", "ParamSet"]
