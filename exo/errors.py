class PlanError(ValueError):
  """A user-facing problem with the planner's input or request: one sentence naming the bad value and what was expected."""
