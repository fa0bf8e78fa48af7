"""The quality gate's tag on a registered model version: the register step writes it, a deploy that names no run
reads it (runner/steps/register.py decides the verdict)."""

GATE_TAG = "quality_gate"
GATE_PASSED = "passed"  # the quality_gate tag of a version that passed (what an implicit deploy requires)
