//! Reading partitions from a start offset up to the end they had when the
//! replay started, under a fresh group id that never commits.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{Offset, TopicPartitionList};

use coupon_platform::kafka::Record;
use coupon_platform::{KafkaSettings, Topics};

use super::{TopicKind, FETCH_WAIT_MS, STALL_TIMEOUT};

/// Where each partition's read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartAt {
    /// The partition's first retained offset.
    #[default]
    Beginning,
    /// This offset in every partition (clamped to what is retained).
    Offset(i64),
}

/// The records `[start, end)` of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRange {
    pub kind: TopicKind,
    pub topic: String,
    pub partition: i32,
    pub start: i64,
    pub end: i64,
}

impl PartitionRange {
    pub fn len(&self) -> u64 {
        (self.end - self.start).max(0) as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the read callback wants next from a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop reading this partition (the rest of its range is skipped).
    StopPartition,
}

/// A consumer outside every consumer group's life: it only ever `assign`s,
/// and never commits.
pub struct Reader {
    consumer: BaseConsumer,
}

impl Reader {
    pub fn new(kafka: &KafkaSettings) -> anyhow::Result<Self> {
        let mut config = kafka.client_config();
        config
            .set(
                "group.id",
                format!("couponctl-replay-{}", uuid::Uuid::new_v4().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", FETCH_WAIT_MS)
            // A replay reads whole logs: fetch big and keep a deep local
            // queue, so the broker round trips overlap the encoding instead
            // of stalling it (librdkafka's defaults, 1 MiB per partition and
            // fetch, suit a consumer that keeps up with a live topic).
            .set("max.partition.fetch.bytes", "16777216")
            .set("fetch.max.bytes", "67108864")
            .set("queued.min.messages", "1000000");
        let consumer: BaseConsumer = config
            .create()
            .with_context(|| format!("creating a Kafka reader for {}", kafka.brokers))?;
        Ok(Self { consumer })
    }

    /// The partition ids of `topic`.
    pub fn partitions(&self, topic: &str) -> anyhow::Result<Vec<i32>> {
        partitions_of(&self.consumer, topic)
    }

    /// `(low, high)` watermarks of one partition.
    pub fn watermarks(&self, topic: &str, partition: i32) -> anyhow::Result<(i64, i64)> {
        self.consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .with_context(|| format!("reading the watermarks of {topic}[{partition}]"))
    }

    /// Refuses a log whose beginning is gone: a partition of `kinds` whose
    /// first offset is past 0 lost records to retention (or a
    /// delete-records), and `what` (a rebuild, an audit) would otherwise
    /// report that loss as differences, or build a database without it.
    pub fn ensure_whole(
        &self,
        topics: &Topics,
        kinds: &[TopicKind],
        what: &str,
    ) -> anyhow::Result<()> {
        let mut cut = Vec::new();
        for &kind in kinds {
            let topic = topics.of(kind);
            for partition in self.partitions(&topic)? {
                let (low, _) = self.watermarks(&topic, partition)?;
                if low > 0 {
                    cut.push(format!("{topic}[{partition}] starts at offset {low}"));
                }
            }
        }
        if cut.is_empty() {
            return Ok(());
        }
        anyhow::bail!(
            "{what} needs the whole log, but its beginning was deleted ({}): the topics \
             keep records for retention.ms only (LOG_RETENTION_MS=-1, the default for \
             topics this system creates, keeps them; `couponctl topics` sets it on \
             existing ones)",
            cut.join(", ")
        )
    }

    /// The ranges to read for `kinds`: from `start` to each partition's
    /// current end (the high watermark snapshot).
    pub fn plan(
        &self,
        topics: &Topics,
        kinds: &[TopicKind],
        start: StartAt,
    ) -> anyhow::Result<Vec<PartitionRange>> {
        let mut ranges = Vec::new();
        for &kind in kinds {
            let topic = topics.of(kind);
            for partition in self.partitions(&topic)? {
                let (low, high) = self.watermarks(&topic, partition)?;
                let from = match start {
                    StartAt::Beginning => low,
                    StartAt::Offset(offset) => offset.max(low),
                };
                ranges.push(PartitionRange {
                    kind,
                    topic: topic.clone(),
                    partition,
                    start: from,
                    end: high,
                });
            }
        }
        Ok(ranges)
    }

    /// Reads every range, calling `each` for every record in order within its
    /// partition, and returns when every range is done.
    pub fn read(
        &self,
        ranges: &[PartitionRange],
        mut each: impl FnMut(TopicKind, Record) -> anyhow::Result<Flow>,
    ) -> anyhow::Result<u64> {
        self.read_raw(ranges, |range, message| {
            each(ranges[range].kind, Record::from_message(message))
        })
    }

    /// [`Reader::read`] without copying the records: `each` gets the index
    /// of the record's range in `ranges` and the message, borrowed from the
    /// client's buffers.
    pub fn read_raw(
        &self,
        ranges: &[PartitionRange],
        mut each: impl FnMut(usize, &BorrowedMessage<'_>) -> anyhow::Result<Flow>,
    ) -> anyhow::Result<u64> {
        let (mut open, tpl) = OpenRanges::plan(ranges)?;
        if open.left == 0 {
            return Ok(0);
        }
        self.consumer
            .assign(&tpl)
            .context("assigning the partitions to read")?;
        let mut read = 0u64;
        let mut last_progress = Instant::now();
        while open.left > 0 {
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    last_progress = Instant::now();
                    let Some(i) = open.range_of(&message) else {
                        continue;
                    };
                    let end = ranges[i].end;
                    if message.offset() >= end {
                        self.close(&mut open, i)?;
                        continue;
                    }
                    let last = message.offset() + 1 >= end;
                    read += 1;
                    let flow = each(i, &message)?;
                    if last || flow == Flow::StopPartition {
                        self.close(&mut open, i)?;
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "error while reading; continuing");
                    open.check_stall(last_progress)?;
                }
                None => {
                    self.close_reached(&mut open)?;
                    open.check_stall(last_progress)?;
                }
            }
        }
        Ok(read)
    }

    /// Records past the end may never come (e.g. a trailing control
    /// record): a position at the end closes the range.
    fn close_reached(&self, open: &mut OpenRanges<'_>) -> anyhow::Result<()> {
        let positions = self.consumer.position().context("reading positions")?;
        for i in 0..open.ranges.len() {
            let range = &open.ranges[i];
            let reached = matches!(
                positions
                    .find_partition(&range.topic, range.partition)
                    .map(|e| e.offset()),
                Some(Offset::Offset(at)) if at >= range.end
            );
            if open.open[i] && reached {
                self.close(open, i)?;
            }
        }
        Ok(())
    }

    fn close(&self, open: &mut OpenRanges<'_>, i: usize) -> anyhow::Result<()> {
        open.open[i] = false;
        open.left -= 1;
        self.unassign(&open.ranges[i].topic, open.ranges[i].partition)
    }

    /// Stops fetching a finished partition (records already fetched for it
    /// are ignored).
    fn unassign(&self, topic: &str, partition: i32) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        self.consumer
            .pause(&tpl)
            .with_context(|| format!("pausing {topic}[{partition}]"))
    }
}

/// The ranges a read still expects records of, found per record by topic
/// and partition without building an owned key.
struct OpenRanges<'r> {
    ranges: &'r [PartitionRange],
    index: HashMap<&'r str, HashMap<i32, usize>>,
    open: Vec<bool>,
    left: usize,
}

impl<'r> OpenRanges<'r> {
    /// Every non-empty range, open, and the assignment that reads them.
    fn plan(ranges: &'r [PartitionRange]) -> anyhow::Result<(Self, TopicPartitionList)> {
        let mut open = OpenRanges {
            ranges,
            index: HashMap::new(),
            open: vec![false; ranges.len()],
            left: 0,
        };
        let mut tpl = TopicPartitionList::new();
        for (i, range) in ranges.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            let planned = open.index.entry(range.topic.as_str()).or_default();
            if planned.insert(range.partition, i).is_some() {
                bail!(
                    "{}[{}] is planned twice in one read",
                    range.topic,
                    range.partition
                );
            }
            open.open[i] = true;
            open.left += 1;
            tpl.add_partition_offset(&range.topic, range.partition, Offset::Offset(range.start))
                .with_context(|| format!("assigning {}[{}]", range.topic, range.partition))?;
        }
        Ok((open, tpl))
    }

    /// The open range `message` belongs to.
    fn range_of(&self, message: &BorrowedMessage<'_>) -> Option<usize> {
        let i = *self
            .index
            .get(message.topic())
            .and_then(|partitions| partitions.get(&message.partition()))?;
        self.open[i].then_some(i)
    }

    fn check_stall(&self, last_progress: Instant) -> anyhow::Result<()> {
        if self.left == 0 || last_progress.elapsed() <= STALL_TIMEOUT {
            return Ok(());
        }
        let mut waiting: Vec<String> = self
            .ranges
            .iter()
            .zip(&self.open)
            .filter(|(_, open)| **open)
            .map(|(r, _)| format!("{}[{}]", r.topic, r.partition))
            .collect();
        waiting.sort();
        bail!(
            "no record for {STALL_TIMEOUT:?} while still expecting some from {}",
            waiting.join(", ")
        )
    }
}

fn partitions_of(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<i32>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("reading the metadata of {topic}"))?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        bail!("topic {topic} does not exist");
    };
    if let Some(error) = t.error() {
        bail!(
            "topic {topic} is not readable: {:?}",
            rdkafka::error::RDKafkaErrorCode::from(error)
        );
    }
    let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    if ids.is_empty() {
        bail!("topic {topic} does not exist (no partitions)");
    }
    ids.sort_unstable();
    Ok(ids)
}

/// The offsets `group` has committed on `topic`, per partition (`None`:
/// nothing committed). Uses a consumer with that group id that never
/// subscribes, assigns or commits, so the group is left exactly as it is.
pub fn committed_offsets(
    kafka: &KafkaSettings,
    group: &str,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, Option<i64>>> {
    let mut config = kafka.client_config();
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let consumer: BaseConsumer = config
        .create()
        .with_context(|| format!("creating a Kafka client for {}", kafka.brokers))?;
    let parts = partitions_of(&consumer, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .with_context(|| format!("reading the offsets {group} committed on {topic}"))?;
    Ok(parts
        .into_iter()
        .map(|p| {
            let offset = match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) if o >= 0 => Some(o),
                _ => None,
            };
            (p, offset)
        })
        .collect())
}
