"""From-scratch versions the library is checked against: feedback attention
in numpy (chapters 2-3) and the naive memory store (chapter 6)."""
