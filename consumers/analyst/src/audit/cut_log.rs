//! The log cut at the live groups' committed offsets: what the audit
//! applies, and the coupons and users it must leave out.

use std::collections::{HashMap, HashSet};

use coupon_domain::CouponCode;
use coupon_platform::kafka::Record;
use coupon_platform::{KafkaSettings, Topics};
use coupon_schemas::ClaimOutcome;

use crate::rebuild::LogRecord;
use crate::replay::{
    committed_offsets, decode_event, Flow, PartitionRange, Reader, TopicEvent, TopicKind,
};

use super::history::{history_cut, HistoryCut};
use super::CUTS;

/// The log, cut at the live groups' committed offsets.
#[derive(Debug, Default)]
pub(super) struct CutLog {
    pub(super) outcomes: Vec<LogRecord>,
    pub(super) undecodable: u64,
    pub(super) in_flight: u64,
    pub(super) skip_coupons: HashSet<String>,
    pub(super) skip_users: HashSet<String>,
    /// Request ids of claims still in flight.
    pub(super) pending_claims: HashSet<String>,
    /// The history role's committed offsets.
    pub(super) history_cut: HistoryCut,
    /// Users whose profile may still change (a `users` record past the
    /// profiles processor's cut names them).
    pub(super) skip_profiles: HashSet<String>,
}

pub(super) fn canonical_code(raw: &str) -> String {
    CouponCode::parse(raw)
        .map(|c| c.to_string())
        .unwrap_or_else(|_| raw.to_owned())
}

impl CutLog {
    pub(super) fn skip_user(&mut self, user: &str) {
        if !user.is_empty() {
            self.skip_users.insert(user.to_owned());
        }
    }

    pub(super) fn skip_coupon(&mut self, code: &str) {
        if !code.is_empty() {
            self.skip_coupons.insert(canonical_code(code));
        }
    }

    /// Notes what a record past the cut touches.
    pub(super) fn in_flight(&mut self, kind: TopicKind, record: &Record) {
        self.in_flight += 1;
        match decode_event(kind, record) {
            Ok(TopicEvent::Created(event)) => {
                if let Ok(coupons) = coupon_consumers::created::coupons_of(&event) {
                    for coupon in coupons {
                        self.skip_coupons.insert(coupon.code.to_string());
                    }
                }
            }
            Ok(TopicEvent::HoldExpired(event)) => {
                self.skip_coupon(&event.coupon_code);
                self.skip_user(&event.user_id);
            }
            Ok(TopicEvent::CouponExpired(event)) => {
                self.skip_coupon(&event.coupon_code);
            }
            // An early end is in Postgres before it is published; the
            // coupons it expires come with events of their own.
            Ok(TopicEvent::CampaignEnded(_)) => {}
            // The order's coupon is the one its user redeemed: the user's
            // coupons are skipped with the user (`skip_user`).
            Ok(TopicEvent::PurchaseCancelled(event)) => {
                self.skip_user(&event.user_id);
            }
            Ok(TopicEvent::ClaimRequested(event)) => {
                self.skip_user(&event.user_id);
                self.pending_claims.insert(event.request_id);
            }
            Ok(TopicEvent::PurchaseRequested(event)) => {
                self.skip_user(&event.user_id);
                self.skip_coupon(&event.coupon_code);
            }
            Ok(TopicEvent::UserProfileUpdated(event)) => {
                self.skip_profiles.insert(event.user_id);
            }
            // Claims and purchases are keyed by user: an undecodable one
            // still names its user (its decision, if any, is `invalid`).
            _ => {
                if let Some(user) = record.key_str() {
                    if matches!(kind, TopicKind::Claims | TopicKind::Purchases) {
                        self.skip_user(user);
                    }
                    if kind == TopicKind::Users {
                        self.skip_profiles.insert(user.to_owned());
                    }
                }
            }
        }
    }

    /// Coupons granted to claims still in flight (their decision was
    /// published but the claim's offset not committed yet).
    pub(super) fn skip_pending_grants(&mut self) {
        let mut codes = Vec::new();
        for log in &self.outcomes {
            if log.kind != TopicKind::ClaimResults {
                continue;
            }
            if let Ok(TopicEvent::ClaimDecided(event)) = decode_event(log.kind, &log.record) {
                if ClaimOutcome::try_from(event.outcome) == Ok(ClaimOutcome::Granted)
                    && self.pending_claims.contains(&event.request_id)
                {
                    codes.push(event.coupon_code);
                }
            }
        }
        for code in codes {
            self.skip_coupon(&code);
        }
    }
}

/// The offset each cut partition (topic, partition) was cut at.
type CutAt = HashMap<(String, i32), i64>;

/// Where each consumer group of [`CUTS`] stands: its committed offset per
/// partition (`None`: nothing committed there yet).
fn committed_cuts(
    kafka: &KafkaSettings,
    topics: &Topics,
) -> anyhow::Result<HashMap<(TopicKind, i32), Option<i64>>> {
    let mut cuts = HashMap::new();
    for role in CUTS {
        // Each of these roles reads exactly one topic.
        let kind = role.topics()[0];
        let group = topics.group(role);
        for (partition, offset) in committed_offsets(kafka, &group, &topics.of(kind))? {
            cuts.insert((kind, partition), offset);
        }
    }
    Ok(cuts)
}

/// The ranges to read, up to each partition's current end, and where each
/// cut partition was cut. Dead letters change no state: everything else is
/// read.
fn plan_ranges(
    reader: &Reader,
    topics: &Topics,
    cuts: &HashMap<(TopicKind, i32), Option<i64>>,
) -> anyhow::Result<(Vec<PartitionRange>, CutAt)> {
    let kinds: Vec<TopicKind> = TopicKind::ALL
        .into_iter()
        .filter(|k| *k != TopicKind::DeadLetter)
        .collect();
    reader.ensure_whole(topics, &kinds, "an audit")?;
    let mut ranges = Vec::new();
    let mut cut_at = CutAt::new();
    for kind in kinds {
        let topic = topics.of(kind);
        for partition in reader.partitions(&topic)? {
            let (low, high) = reader.watermarks(&topic, partition)?;
            let start = match kind {
                // Published only after (decisions) or just before (blacklist
                // changes) their effect commits: all of it counts.
                TopicKind::ClaimResults | TopicKind::PurchaseResults | TopicKind::Blacklist => low,
                _ => {
                    // Nothing committed: nothing is known to be done.
                    let cut = cuts
                        .get(&(kind, partition))
                        .copied()
                        .flatten()
                        .unwrap_or(low)
                        .clamp(low, high);
                    cut_at.insert((topic.clone(), partition), cut);
                    // Requests below the cut are done; only later ones matter.
                    if matches!(kind, TopicKind::Claims | TopicKind::Purchases) {
                        cut
                    } else {
                        low
                    }
                }
            };
            ranges.push(PartitionRange {
                kind,
                topic: topic.clone(),
                partition,
                start,
                end: high,
            });
        }
    }
    Ok((ranges, cut_at))
}

/// Reads the committed offsets, then the log up to its current end. Blocking.
pub(super) fn read_cut_log(
    kafka: &KafkaSettings,
    topics: &Topics,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<CutLog> {
    // Offsets first: everything they cover is then below the ends read next.
    let cuts = committed_cuts(kafka, topics)?;
    let history_cut = history_cut(kafka, topics)?;
    let reader = Reader::new(kafka)?;
    let (ranges, cut_at) = plan_ranges(&reader, topics, &cuts)?;
    bar.set_length(ranges.iter().map(PartitionRange::len).sum());
    let mut log = CutLog {
        history_cut,
        ..CutLog::default()
    };
    reader.read(&ranges, |kind, record| {
        bar.inc(1);
        let past_cut = cut_at
            .get(&(record.topic.clone(), record.partition))
            .is_some_and(|cut| record.offset >= *cut);
        if past_cut {
            log.in_flight(kind, &record);
        } else if matches!(kind, TopicKind::Claims | TopicKind::Purchases) {
            // Below the cut (not planned to be read): done.
        } else {
            match LogRecord::new(kind, record) {
                Some(record) => log.outcomes.push(record),
                None => log.undecodable += 1,
            }
        }
        Ok(Flow::Continue)
    })?;
    log.skip_pending_grants();
    Ok(log)
}
