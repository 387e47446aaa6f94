//! Topic creation through the admin API. The local broker does not create
//! topics on first use (`auto.create.topics.enable=false`, as production
//! clusters should run), so every process that needs topics ensures them at
//! start-up; existing ones are kept as they are. Runs that make their own
//! topics (tests, the benchmarks) delete them when they end, since every
//! partition left behind lengthens the broker's next start.

use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::KafkaSettings;

#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    /// Replicas per partition; `None` takes the broker's
    /// `default.replication.factor` (1 on the local node, 3 on a cluster).
    pub replication: Option<i32>,
    /// Topic configs set at creation (e.g. `message.timestamp.type`); the
    /// broker's defaults for the rest.
    pub configs: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot create an admin client for {brokers}: {source}")]
    Client { brokers: String, source: KafkaError },
    #[error("creating topics on {brokers} failed: {source}")]
    Request { brokers: String, source: KafkaError },
    #[error("listing or deleting topics on {brokers} failed: {source}")]
    Delete { brokers: String, source: KafkaError },
    #[error(
        "topic {topic} does not exist (or this principal may not describe it) and this \
         principal may not create it: create the topics with `couponctl topics` as the \
         operator (infra/kafka/acls.tsv)"
    )]
    NotAllowed { topic: String },
    #[error("creating topic {topic} failed: {code}")]
    Topic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("reading or changing the configs of topics on {brokers} failed: {source}")]
    Configs { brokers: String, source: KafkaError },
    #[error("reading or changing the configs of topic {topic} failed: {code}")]
    TopicConfigs {
        topic: String,
        code: RDKafkaErrorCode,
    },
}

/// The value of config `key` of each of `topics` as the broker has it
/// (`None` where the broker reports none).
pub async fn topic_config(
    settings: &KafkaSettings,
    topics: &[String],
    key: &str,
) -> Result<Vec<(String, Option<String>)>, AdminError> {
    let failed = |source| AdminError::Configs {
        brokers: settings.brokers.clone(),
        source,
    };
    let admin = admin_client(settings)?;
    let specifiers: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(15)));
    let results = admin
        .describe_configs(specifiers.iter(), &options)
        .await
        .map_err(failed)?;
    topics
        .iter()
        .zip(results)
        .map(|(topic, result)| match result {
            Ok(resource) => Ok((
                topic.clone(),
                resource.get(key).and_then(|entry| entry.value.clone()),
            )),
            Err(code) => Err(AdminError::TopicConfigs {
                topic: topic.clone(),
                code,
            }),
        })
        .collect()
}

/// Sets the configs of an existing topic to `configs`. The admin API's
/// (non-incremental) alter replaces every config the topic had set, so
/// `configs` must be all of them (what the topic was created with).
pub async fn set_topic_configs(
    settings: &KafkaSettings,
    topic: &str,
    configs: &[(String, String)],
) -> Result<(), AdminError> {
    let admin = admin_client(settings)?;
    let alter = configs.iter().fold(
        AlterConfig::new(ResourceSpecifier::Topic(topic)),
        |alter, (key, value)| alter.set(key, value),
    );
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(15)));
    let results = admin
        .alter_configs([&alter], &options)
        .await
        .map_err(|source| AdminError::Configs {
            brokers: settings.brokers.clone(),
            source,
        })?;
    for result in results {
        if let Err((_, code)) = result {
            return Err(AdminError::TopicConfigs {
                topic: topic.to_owned(),
                code,
            });
        }
    }
    Ok(())
}

/// Creates the topics that do not exist yet. Returns the names it created.
///
/// The topics that exist are read from the cluster's metadata first and
/// only the missing ones are asked for: on a cluster with ACLs the broker
/// answers a create with `TopicAuthorizationFailed` for every topic the
/// principal may not create, whether it exists or not, and the services'
/// principals may only describe their topics (`infra/kafka/acls.tsv`).
pub async fn ensure_topics(
    settings: &KafkaSettings,
    topics: &[TopicSpec],
) -> Result<Vec<String>, AdminError> {
    let admin = admin_client(settings)?;
    let existing: std::collections::HashSet<String> = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(15))
        .map_err(|source| AdminError::Request {
            brokers: settings.brokers.clone(),
            source,
        })?
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .collect();
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .filter(|t| !existing.contains(&t.name))
        .map(|t| {
            let topic = NewTopic::new(
                &t.name,
                t.partitions,
                // -1 asks the broker for its default (KIP-464).
                TopicReplication::Fixed(t.replication.unwrap_or(-1)),
            );
            t.configs
                .iter()
                .fold(topic, |topic, (key, value)| topic.set(key, value))
        })
        .collect();
    if new_topics.is_empty() {
        return Ok(Vec::new());
    }
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(15)));
    let results = admin
        .create_topics(new_topics.iter(), &options)
        .await
        .map_err(|source| AdminError::Request {
            brokers: settings.brokers.clone(),
            source,
        })?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(topic) => created.push(topic),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, RDKafkaErrorCode::TopicAuthorizationFailed)) => {
                return Err(AdminError::NotAllowed { topic })
            }
            Err((topic, code)) => return Err(AdminError::Topic { topic, code }),
        }
    }
    Ok(created)
}

fn admin_client(settings: &KafkaSettings) -> Result<AdminClient<DefaultClientContext>, AdminError> {
    settings
        .client_config()
        .create()
        .map_err(|source| AdminError::Client {
            brokers: settings.brokers.clone(),
            source,
        })
}

/// Deletes every topic whose name `doomed` picks; returns how many were
/// asked to go. A topic that fails to go is left (it costs disk only).
pub async fn delete_topics_where(
    settings: &KafkaSettings,
    doomed: impl Fn(&str) -> bool,
) -> Result<usize, AdminError> {
    let failed = |source| AdminError::Delete {
        brokers: settings.brokers.clone(),
        source,
    };
    let admin = admin_client(settings)?;
    let names: Vec<String> = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(failed)?
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|name| doomed(name))
        .collect();
    if names.is_empty() {
        return Ok(0);
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    admin
        .delete_topics(
            &refs,
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .map_err(failed)?;
    Ok(names.len())
}
