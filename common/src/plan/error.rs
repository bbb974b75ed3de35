//! The planner's error: the config field at fault and what to change.

#[derive(Debug, thiserror::Error)]
#[error("training.{field}: {msg}")]
pub struct PlanError {
    pub field: &'static str,
    pub msg: String,
}

pub(super) fn err<T>(field: &'static str, msg: impl Into<String>) -> Result<T, PlanError> {
    Err(PlanError {
        field,
        msg: msg.into(),
    })
}
