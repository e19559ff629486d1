"""The memory engine (in progress): a host AdamW that steps fp32 masters in one multi-threaded
pass per tensor, with the gradient scale and the bf16 copy-out fused in. Gradient streaming,
ZeRO-2 sharding and the memory planner come next."""

from slipstream.offload.host_adam import HostAdamW

__all__ = ["HostAdamW"]
