"""From the command line to objects, one job per module (each app imports what it needs from here):

* ``composing``   Hydra composition of an app's config (``configs/``), its errors as what / why / fix
* ``schema``      the type and range of every value (``Spec``, ``FID_SCHEMA``, ``TRAIN_SCHEMA``), ``_target_`` checks
* ``validation``  ``compose`` (compose + validate) and ``validate``, the training config's whole-config checks
* ``resume``      what a resume must keep of the recorded run
* ``checkpoints`` reading checkpoints (``weights_only=True``; each call returns what it read)
* ``building``    ``build(cfg)`` -> (GenerativeModule, datamodule), ``module_from_checkpoint``
* ``entry``       ``run_app``: how every app starts (checks before Hydra runs the job)
"""
from genflow.config.building import (build, build_data, build_method, build_net, instantiate, module_from_checkpoint,
                                     to_container)
from genflow.config.checkpoints import (config_from_checkpoint, load_weights, newest_valid, read_checkpoint,
                                        read_resumable)
from genflow.config.composing import (APP_DIRS, APP_FILES, APPS, CONFIG_DIR, GROUPS, check_choices, compose_config,
                                      declared_knobs, hydra_error, options)
from genflow.config.entry import HYDRA_FLAGS, plain_app, preflight, run_app, run_plain, sweep_variants
from genflow.config.resume import RECORDED, check_resume, explicit_sections
from genflow.config.schema import (FID_SCHEMA, GENFLOW_TRAINER_KEYS, MATMUL_PRECISIONS, OPTIM_SCHEMA, PRECISION,
                                   SAMPLER_SCHEMA, TRAIN_SCHEMA, sampler_options, Bool, Float, Int, Spec, Str, accepted_params, check_schema, check_target,
                                   fid_options, target_class)
from genflow.config.validation import (check_compile, check_device, check_files, check_knobs, check_output_dir,
                                       check_trainer, compose, data_conditions, validate)

__all__ = [
    "APP_DIRS", "APP_FILES", "APPS", "Bool", "CONFIG_DIR", "FID_SCHEMA", "Float", "GENFLOW_TRAINER_KEYS", "GROUPS",
    "HYDRA_FLAGS", "Int", "MATMUL_PRECISIONS", "OPTIM_SCHEMA", "PRECISION", "RECORDED", "Spec", "Str",
    "SAMPLER_SCHEMA", "TRAIN_SCHEMA", "accepted_params", "sampler_options", "build", "build_data", "build_method", "build_net", "check_choices",
    "check_compile", "check_device", "check_files", "check_knobs", "check_output_dir", "check_resume",
    "check_schema", "check_target", "check_trainer", "compose", "compose_config", "config_from_checkpoint",
    "data_conditions", "declared_knobs", "explicit_sections", "fid_options", "hydra_error", "instantiate", "load_weights",
    "module_from_checkpoint", "newest_valid", "options", "plain_app", "preflight", "read_checkpoint", "read_resumable",
    "run_app", "run_plain", "sweep_variants", "target_class", "to_container", "validate",
]
