//! The serving commands' retention flags (`coupon_platform::store::retention`),
//! flattened into `ServeArgs`: how long decisions, quota slots and history
//! are kept, and how long a request id is recognised, with the rule between
//! them checked before anything starts.

use clap::Args;

use coupon_platform::settings::{self, Flag};
use coupon_platform::store::retention::Retention;

#[derive(Args, Debug, Clone)]
pub struct RetentionArgs {
    /// How long a claim decision is kept after it was decided, and a quota
    /// slot after its window ended; whole UTC days leave by partition.
    #[arg(long, env = "DECISION_RETENTION", default_value_t = Flag(settings::DECISION_RETENTION), value_parser = settings::DECISION_RETENTION_SPAN.parser())]
    pub decision_retention: Flag,
    /// How long after a claim a client's retry under its request id is
    /// still answered with the stored decision (redeliveries always are).
    #[arg(long, env = "REQUEST_ID_HORIZON", default_value_t = Flag(settings::REQUEST_ID_HORIZON), value_parser = settings::REQUEST_ID_HORIZON_SPAN.parser())]
    pub request_id_horizon: Flag,
    /// How long the history is kept (e.g. 400d); whole months leave once
    /// they ended that long ago. Unset: kept for ever.
    #[arg(long, env = "HISTORY_RETENTION", value_parser = settings::HISTORY_RETENTION_SPAN.parser())]
    pub history_retention: Option<Flag>,
}

impl RetentionArgs {
    /// The rule between the settings, refused in one line naming both: a
    /// retry is recognised by its stored decision, which must still be kept.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.request_id_horizon.0 > self.decision_retention.0 {
            anyhow::bail!(
                "REQUEST_ID_HORIZON={} must not be longer than DECISION_RETENTION={}: \
                 a retry is recognised by its stored decision",
                self.request_id_horizon,
                self.decision_retention
            );
        }
        Ok(())
    }

    pub fn retention(&self) -> Retention {
        Retention {
            decisions: self.decision_retention.0,
            history: self.history_retention.map(|keep| keep.0),
        }
    }
}
