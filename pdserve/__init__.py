"""pdserve: prefill/decode disaggregated serving for vLLM.

The package is laid out one folder per component:

- ``pdserve.kv``: the KV data plane, a vLLM KV connector and its torch.distributed transport;
- ``pdserve.instance``: what runs inside a vLLM instance (launch, registration, load reports);
- ``pdserve.scheduler``: the global scheduler, pure policy over a cluster snapshot;
- ``pdserve.gateway``: the OpenAI-compatible HTTP front end;
- ``pdserve.cluster``: the single-machine launcher behind ``pdserve serve``.
"""

__version__ = "0.1.0"

VLLM_VERSION = "0.32.0"
