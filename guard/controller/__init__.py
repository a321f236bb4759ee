"""The backtracking controller and the events it emits."""
