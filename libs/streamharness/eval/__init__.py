"""Streaming-Eval: time-aware evaluation of a streaming assistant.

* :mod:`streamharness.eval.episode`: the episode format (a video plus timed questions and standing
  instructions, each with the time windows in which an answer counts) and the record of one run of
  a system over an episode (:class:`~streamharness.eval.episode.EpisodeRun`).
* :mod:`streamharness.eval.scoring`: SW-F1 = 2TP / (2TP + 0.2FP + 2FN), per mode × position cell,
  response delays, latency percentiles, the JSON result and the regression table of two results.
* :mod:`streamharness.eval.report`: a self-contained HTML report of one result (or two, compared).
* :mod:`streamharness.eval.runner`: replays episodes through a pipeline and produces ``EpisodeRun``s.
"""
