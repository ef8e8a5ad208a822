"""linear: the weighted sum of the adapters' updates, sum_i w_i dW_i, exactly.

Stored without loss as one LoRA of rank sum_i r_i: the factors side by side, B = [w_1 s_1 B_1 | w_2 s_2 B_2
| ...] and A = [A_1; A_2; ...], with scale 1 (s_i the scale adapter i is applied with). Any mix of ranks,
alphas, rsLoRA and target modules. (peft's add_weighted_adapter "linear" sums the A's and the B's separately
instead, which adds cross terms B_i A_j, and refuses mixed ranks.)
"""

from lrtool.merge.base import Method, ModuleInputs, Settings, Update


def linear(module: ModuleInputs, settings: Settings) -> Update:
    return Update.factored(*module.linear())


METHOD = Method(
    name="linear",
    summary="sum_i w_i dW_i exactly, stored as one LoRA of rank sum_i r_i (factors concatenated)",
    compute=linear,
)
