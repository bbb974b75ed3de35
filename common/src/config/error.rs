//! The error of an invalid training config: the field and the fix.

#[derive(Debug, thiserror::Error)]
#[error("training.{field}: {msg}")]
pub struct TrainConfigError {
    pub field: &'static str,
    pub msg: String,
}
