"""Downstream evaluation during training: multiple-choice tasks from local files (`eval.tasks`)."""
