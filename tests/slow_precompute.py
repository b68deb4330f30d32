"""`longred precompute` with every shard write slowed down, so a test can kill it between shards."""

import sys
import time

from longred.cli import main
from longred.storage._writer import CacheWriter

write_shard = CacheWriter._write_shard


def slow_write_shard(self, *args):
    time.sleep(0.3)
    write_shard(self, *args)


CacheWriter._write_shard = slow_write_shard
sys.exit(main(["precompute", *sys.argv[1:]]))
