"""Fee and split settlement: schedules, the fee kernel's oracle, and expansion into legs."""
