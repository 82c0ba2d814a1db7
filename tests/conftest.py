import os

import pytest

# Tests never download anything and use few threads (2-core CI machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

# The tests that `make test-fast` leaves out (marker `slow`): several processes, a whole demo, long fault-injection
# loops. One list, by file or by test name, so the fast loop is defined in one place; `make test` runs everything.
SLOW_FILES = {"test_certify_crash.py", "test_finetune_ddp.py", "test_demo.py", "test_route_diffusers.py",
              "test_route_openai_unet.py", "test_edm_route.py", "test_cost.py", "test_flax_ncsnpp_finetune.py"}
SLOW_FIXTURES = {"demo_runs"}  # full and early-stopped demo certifications (test_early_stop.py)
SLOW_TESTS = {
    "test_shard_count_changes_nothing_in_the_counts_or_the_aggregate",
    "test_run_directory_resumes_refuses_and_overwrites",
    "test_predict_mode_and_several_sigmas_through_the_local_executor",
    "test_a_failing_shard_job_is_reported_in_one_line",
    "test_training_is_deterministic_and_loads",
    "test_shipped_weights_measure_as_recorded",
    "test_two_gloo_ranks_through_submitit",
    "test_upstream_file_converts_inspects_certifies_and_aggregates",
    "test_fid_of_purification_like_noise_grows_and_a_set_against_itself_is_zero",
    "test_two_ranks_match_one_rank",
    "test_sigterm_stops_at_a_checkpointed_step_and_the_rerun_matches",
    "test_sigkill_then_rerun_equals_the_uninterrupted_run",
    "test_quality_runs_share_the_noise_and_report",
    "test_same_units_in_1_4_64_files_any_order_give_identical_bytes",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (os.path.basename(str(item.fspath)) in SLOW_FILES or item.originalname in SLOW_TESTS
                or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.slow)
