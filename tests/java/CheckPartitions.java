// Reads a claims topic from its start to its end and checks, for every user
// whose id starts with PREFIX, that all of the user's claims sit on one
// partition, the one the Java producer's default partitioner picks
// (murmur2), whoever published them: the Java storefront example
// (envelope producer STOREFRONT) and the gateway (any other producer).
//
//   java -cp "<the example's classpath>" tests/java/CheckPartitions.java \
//        BROKERS TOPIC PREFIX STOREFRONT EXPECTED_USERS
//
// Prints one line per user and `partitions: ok ...`; exits 1 otherwise.
// Used by tests/java/run.sh.
import coupons.v1.Events.ClaimRequested;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.TreeMap;
import java.util.TreeSet;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.internals.BuiltInPartitioner;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

public class CheckPartitions {
  record Seen(TreeSet<Integer> partitions, TreeSet<String> producers, int[] counts) {}

  public static void main(String[] args) throws Exception {
    String brokers = args[0], topic = args[1], prefix = args[2], storefront = args[3];
    int expectedUsers = Integer.parseInt(args[4]);
    Properties props = new Properties();
    props.put("bootstrap.servers", brokers);
    props.put("enable.auto.commit", "false");
    props.put("key.deserializer", ByteArrayDeserializer.class.getName());
    props.put("value.deserializer", ByteArrayDeserializer.class.getName());
    Map<String, Seen> users = new TreeMap<>();
    int partitionCount;
    try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(props)) {
      List<TopicPartition> partitions = new ArrayList<>();
      consumer.partitionsFor(topic, Duration.ofSeconds(30))
          .forEach(p -> partitions.add(new TopicPartition(topic, p.partition())));
      partitionCount = partitions.size();
      Map<TopicPartition, Long> ends = consumer.endOffsets(partitions, Duration.ofSeconds(30));
      consumer.assign(partitions);
      consumer.seekToBeginning(partitions);
      long deadline = System.nanoTime() + Duration.ofSeconds(60).toNanos();
      while (partitions.stream().anyMatch(p -> consumer.position(p) < ends.get(p))) {
        if (System.nanoTime() > deadline) {
          System.out.println("FAILED: reading " + topic + " timed out");
          System.exit(1);
        }
        for (ConsumerRecord<byte[], byte[]> r : consumer.poll(Duration.ofMillis(200))) {
          if (r.key() == null) continue;
          String key = new String(r.key(), java.nio.charset.StandardCharsets.UTF_8);
          if (!key.startsWith(prefix)) continue;
          ClaimRequested claim;
          try {
            claim = ClaimRequested.parseFrom(r.value());
          } catch (com.google.protobuf.InvalidProtocolBufferException e) {
            continue;
          }
          if (!claim.hasEnvelope()) continue; // the example's dead-letter mistake
          String producer = claim.getEnvelope().getProducer();
          boolean ours = producer.equals(storefront);
          Seen seen = users.computeIfAbsent(
              key, k -> new Seen(new TreeSet<>(), new TreeSet<>(), new int[2]));
          seen.partitions.add(r.partition());
          seen.producers.add(producer.replaceAll("@.*", "@..."));
          seen.counts[ours ? 0 : 1]++;
        }
      }
    }
    List<String> failures = new ArrayList<>();
    System.out.println("user                  partition  murmur2  storefront  gateway  producers");
    for (var e : users.entrySet()) {
      String user = e.getKey();
      Seen seen = e.getValue();
      int murmur2 = BuiltInPartitioner.partitionForKey(
          user.getBytes(java.nio.charset.StandardCharsets.UTF_8), partitionCount);
      System.out.printf("%-21s %9s  %7d  %10d  %7d  %s%n",
          user, seen.partitions, murmur2, seen.counts[0], seen.counts[1], seen.producers);
      if (seen.partitions.size() != 1) failures.add(user + " on partitions " + seen.partitions);
      else if (seen.partitions.first() != murmur2) failures.add(user + " not on murmur2's partition " + murmur2);
      if (seen.counts[0] == 0) failures.add(user + " has no claim from " + storefront);
      if (seen.counts[1] == 0) failures.add(user + " has no claim from the gateway");
    }
    if (users.size() != expectedUsers) {
      failures.add(users.size() + " users on " + topic + ", expected " + expectedUsers);
    }
    for (String f : failures) System.out.println("FAILED: " + f);
    if (!failures.isEmpty()) System.exit(1);
    System.out.printf(
        "partitions: ok, %d users, every claim of each user (storefront and gateway) on its murmur2 partition of %d%n",
        users.size(), partitionCount);
  }
}
