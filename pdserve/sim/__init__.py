"""A discrete-event simulator of a pdserve cluster that runs pdserve's own scheduling code.

The dispatch and rescheduling policies (``pdserve.scheduler``) and the gateway's control-plane
bookkeeping (``pdserve.gateway.control_plane``: pending and held work, health) are called
unchanged on a simulated clock; only the instances (vLLM's engine step, the KV connector's
phases, live migration's stages) are modelled, with step times from a profile
(``pdserve.sim.profile``).
"""
