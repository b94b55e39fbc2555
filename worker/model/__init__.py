"""Model code: pure functions and modules over tensors. No Redis, HTTP or files in here
(``loading`` aside, which reads weights)."""
