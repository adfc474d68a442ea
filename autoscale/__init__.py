"""Scale-out beyond one machine: KEDA/HPA manifests and a model of the two scaling levels.

The YAML files here are the manifests; :mod:`autoscale.simulate` replays arrival traces
against them (``python -m autoscale.simulate --trace spike``) and
:mod:`autoscale.check_model` checks the model against real workers on this machine.
"""
