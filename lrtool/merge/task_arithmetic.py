"""task-arithmetic: an alias of linear under mergekit's name (task_arithmetic, Ilharco et al., 2023), so
that people who know the method by that name find it: sum_i w_i dW_i exactly, stored as one LoRA of rank
sum_i r_i (factored, the factors concatenated; see linear.py). mergekit's `lambda` multiplies every weight:
pass the products as --weights.
"""

from lrtool.merge.base import Method, ModuleInputs, Settings, Update


def task_arithmetic(module: ModuleInputs, settings: Settings) -> Update:
    return Update.factored(*module.linear())


METHOD = Method(
    name="task-arithmetic",
    summary="alias of linear (mergekit's task_arithmetic): sum_i w_i dW_i exactly (factored)",
    compute=task_arithmetic,
)
