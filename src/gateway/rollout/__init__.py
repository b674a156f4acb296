"""Model rollouts: a primary version and one candidate, in shadow or canary mode.

::

    state.py     the rollout's state (what Redis holds), sticky assignment     (pure)
    analysis.py  per-variant counts, fleet P99, the canary's verdict            (pure)
    store.py     Redis (gw:rollout:{model}:*) and in-memory state stores
    runtime.py   per worker: follow the state, count, decide (the lease holder)
    shadow.py    the candidate scores shadowed requests off the request path
    cli.py       ``gateway rollout start|status|promote|abort``
"""
