"""Which weights or how many units go: masks, unit counts and the schedule of steps."""
