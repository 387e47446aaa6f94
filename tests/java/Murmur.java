// The partition Apache Kafka's Java producer picks for a key, computed by the
// real kafka-clients jar (the one `make setup` installs with the broker):
//
//   printf '%s\n' <hex-encoded keys> | java -cp "$KAFKA_LIBS/*" tests/java/Murmur.java 2 12
//
// prints, per input line, the hex key and its partition for each partition
// count given: `Utils.toPositive(Utils.murmur2(key)) % n`, which is what the
// default partitioner (BuiltInPartitioner.partitionForKey) does with a keyed
// record; exits 1 if the two ever disagree. Used by tests/it/partitioner.rs.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.HexFormat;
import org.apache.kafka.clients.producer.internals.BuiltInPartitioner;
import org.apache.kafka.common.utils.Utils;

public class Murmur {
  public static void main(String[] args) throws Exception {
    int[] counts = new int[args.length];
    for (int i = 0; i < args.length; i++) counts[i] = Integer.parseInt(args[i]);
    BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.US_ASCII));
    StringBuilder out = new StringBuilder();
    for (String line; (line = in.readLine()) != null; ) {
      if (line.startsWith("#")) continue;
      String hex = line.strip();
      byte[] key = HexFormat.of().parseHex(hex);
      out.append(hex.isEmpty() ? "-" : hex);
      for (int n : counts) {
        int utils = Utils.toPositive(Utils.murmur2(key)) % n;
        int producer = BuiltInPartitioner.partitionForKey(key, n);
        if (utils != producer) {
          System.err.println("Utils.murmur2 and BuiltInPartitioner disagree on " + hex);
          System.exit(1);
        }
        out.append(' ').append(utils);
      }
      out.append('\n');
    }
    System.out.print(out);
  }
}
