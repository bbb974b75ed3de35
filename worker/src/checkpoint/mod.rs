//! What a StackWise checkpoint holds (DESIGN §6): the one owner of its file names, of the
//! shared frozen/backup objects and of turning a verified checkpoint back into weights. The
//! storage underneath (manifests, verification, retention) is `stackwise_common::checkpoint`.

pub mod layout;
pub mod scaffold;

pub use layout::{
    ADAPTER, BACKUP, CONFIG, EMA, FROZEN, MODEL, OPTIMIZER, TOKENIZER, TRAINER_STATE,
    backup_object, base_weights, frozen_object, load_weights, model_config, read_shared, tensors,
    tokenizer,
};
