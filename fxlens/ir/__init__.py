"""The graph layer every other one builds on: fx graph helpers, parameters (Linear), index traces, hook points."""
