"""What a load is and how it is measured, shared by the benchmarks and the simulator.

``workloads`` makes the requests (lengths, prompts), ``arrivals`` when they are sent, and
``metrics`` summarises what happened to each (TTFT, TPOT, ITL, goodput): one copy of each,
so a simulated point and a measured one are computed by the same code.
"""
