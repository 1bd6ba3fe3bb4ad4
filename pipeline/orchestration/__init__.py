"""Running the stages: config -> plan -> runner (resumable, code-versioned) -> results (load_run), and export."""
