//! Configuration (DESIGN §1, STYLE "Configuration"): the raw serde layer of the YAML file
//! with `STACKWISE_*` and `--set` overrides, then resolved, validated values. The model
//! section and Hugging Face `config.json` resolve into one [`ModelConfig`].

pub mod adapter;
pub mod device;
pub mod error;
pub mod load;
pub mod model;
pub mod overrides;
pub mod precision;
pub mod scaffold;
pub mod train;

pub use adapter::{AdapterMethod, AdapterSection, default_targets};
pub use device::DeviceSpec;
pub use load::{absolutize, config_from_str, load_config, require_world_divides_batch};
pub use model::{
    Activation, AttentionKind, AttentionMode, ConfigError, Family, ModelConfig, NormKind,
    Positions, RawModelConfig,
};
pub use overrides::{apply_env, apply_sets};
pub use scaffold::{FuserMode, ScaffoldLora, ScaffoldPool, ScaffoldSection};
pub use train::{
    ActivationCacheKind, Autocast, DataSection, EvalStrategy, FinetuneStage, FusionMode,
    MaskSchedule, Objective, Precision, RunSection, ScheduleShape, TrainConfig, TrainConfigError,
    TrainingMode, TrainingSection,
};
