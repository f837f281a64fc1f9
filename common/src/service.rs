//! Why a service could not start or stopped serving: the error of the
//! services' `App::build` and `App::run` and of their commands.

/// Why a service could not start, or stopped serving abnormally: a setting
/// that is invalid, or the step that failed with its failure as the source
/// (`Display` names the step only; log the chain with
/// [`crate::error_chain`]).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A setting is invalid (the message names it and why).
    #[error("invalid settings: {0}")]
    Settings(String),
    /// A step of starting, serving or a command failed.
    #[error("{step}")]
    Step {
        /// What was being done.
        step: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Names the step a failure happened in: `.step("connecting to NATS")?`.
pub trait StepExt<T> {
    /// The error as a [`ServiceError::Step`] of `step`.
    fn step(self, step: impl Into<String>) -> Result<T, ServiceError>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> StepExt<T> for Result<T, E> {
    fn step(self, step: impl Into<String>) -> Result<T, ServiceError> {
        self.map_err(|e| ServiceError::Step {
            step: step.into(),
            source: Box::new(e),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{ServiceError, StepExt};

    #[test]
    fn a_step_names_itself_and_keeps_its_cause_as_the_source() {
        let failed: Result<(), std::io::Error> = Err(std::io::Error::other("refused"));
        let e = failed.step("binding 127.0.0.1:8080").unwrap_err();
        assert_eq!(e.to_string(), "binding 127.0.0.1:8080");
        assert_eq!(crate::error_chain(&e), "binding 127.0.0.1:8080: refused");
        let settings = ServiceError::Settings("BANK_TIME_ZONE \"Mars\"".into());
        assert_eq!(
            settings.to_string(),
            "invalid settings: BANK_TIME_ZONE \"Mars\""
        );
    }
}
