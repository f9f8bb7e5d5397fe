"""A seeded generator of synthetic logs in the LogHub line format.

Used only when `c.data.dir` is empty, so the main command runs on a fresh
machine without the real logs. Everything it produces is labelled
'synthetic:<system>' and the task's `data_source` says so; it is never
presented as real data.

Each system has its own normal and anomaly message templates, in its own
LogHub header layout (BGL: 9 header fields, Thunderbird/Spirit: 8; see
`logs.py`). Lines come in blocks of `block` lines; round(anomaly_rate x
blocks) blocks, drawn at random, are anomalous and hold 1 to 3 anomaly lines
at random positions. With window size == block, that fraction of the windows
is anomalous. To make it learnable but not trivial, some normal templates share
words with the anomaly ones ('error corrected' vs 'error interrupt',
'EXT3-fs: mounted' vs 'EXT3-fs error'), and an anomalous window has as few as
one anomalous line among normal ones.
"""

from collections.abc import Iterator
import pathlib
import random
import re
import time

VERSION = 'v1'

# Per system: normal templates and (alert tag, template) anomaly templates.
# BGL templates are 'COMPONENT LEVEL message'; Thunderbird/Spirit ones are
# 'component[pid]: message'.
SYSTEMS = {
    'BGL': {
        'normal': [
            'KERNEL INFO instruction cache parity error corrected',
            'KERNEL INFO data cache parity error corrected',
            'KERNEL INFO {n} double-hummer alignment exceptions',
            'KERNEL INFO CE sym {n1}, at 0x{hex}, mask 0x{n1}{n1}',
            'KERNEL INFO generating core.{n}',
            'KERNEL WARNING total of {n1} ddr error(s) detected and corrected',
            'MMCS INFO idoproxy communication established',
            'APP INFO ciod: Message code {n1} is not 51 or 4294967295',
        ],
        'anomalous': [
            ('KERNDTLB', 'KERNEL FATAL data TLB error interrupt'),
            ('KERNSTOR', 'KERNEL FATAL data storage interrupt'),
            ('APPREAD', 'APP FATAL ciod: failed to read message prefix on '
             'control stream'),
            ('KERNMNTF', 'KERNEL FATAL Lustre mount FAILED : bglio{n1}'),
            ('KERNTERM', 'KERNEL FATAL rts: kernel terminated for reason '
             '{n}'),
        ],
    },
    'Thunderbird': {
        'normal': [
            'crond[{pid}]: session opened for user root',
            'crond[{pid}]: session closed for user root',
            'ntpd[{pid}]: synchronized to {ip}, stratum {n1}',
            'dhcpd: DHCPREQUEST for {ip} via eth0',
            'sshd[{pid}]: Accepted publickey for root from {ip}',
            'ib_sm.x[{pid}]: No configuration change required',
            'kernel: EDAC k8: ECC check passed on node {n1}',
        ],
        'anomalous': [
            ('VAPI', 'kernel: [KERNEL_IB] Failed to post send request'),
            ('ECC', 'kernel: EDAC k8 MC{n1}: general bus error'),
            ('CPU', 'kernel: CPU{n1}: Temperature above threshold'),
            ('PBS_CHK', 'pbs_mom: task_check, cannot tm_reply to task {n}'),
        ],
    },
    'Spirit': {
        'normal': [
            'dhcpd: DHCPDISCOVER via eth0: no free leases',
            'dhcpd: DHCPOFFER on {ip} via eth0',
            'sshd[{pid}]: Accepted publickey for root from {ip}',
            'in.tftpd[{pid}]: tftp: client does not accept options',
            'kernel: EXT3-fs: mounted filesystem',
            'syslog-ng[{pid}]: STATS: dropped 0',
        ],
        'anomalous': [
            ('EXT-FS', 'kernel: EXT3-fs error (device sda5)'),
            ('GM_LANAI', 'kernel: GM: LANai is not running'),
            ('PBS_BFD', 'pbs_mom: Bad file descriptor (9) in tm_request'),
            ('GM_PAR', 'kernel: GM: NIC ISR reports an SRAM parity error'),
        ],
    },
}
_START = {'BGL': 1117838570, 'Thunderbird': 1131566461, 'Spirit': 1104566400}
_MONTHS = ('Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec').split()
_FIELD = re.compile(r'\{(n|n1|hex|ip|pid)\}')


def _fill(template: str, rng: random.Random) -> str:
  def value(m: re.Match[str]) -> str:
    kind = m.group(1)
    if kind == 'n':
      return str(rng.randrange(1, 10000))
    if kind == 'n1':
      return str(rng.randrange(10))
    if kind == 'hex':
      return f'{rng.getrandbits(32):08x}'
    if kind == 'ip':
      return f'10.0.{rng.randrange(10)}.{rng.randrange(1, 100)}'
    return str(rng.randrange(100, 1000))  # pid
  return _FIELD.sub(value, template)


def _header(system: str, tag: str, ts: int, node: str) -> str:
  """The LogHub header fields for one line (label first)."""
  t = time.gmtime(ts)
  date = time.strftime('%Y.%m.%d', t)
  if system == 'BGL':
    full = time.strftime('%Y-%m-%d-%H.%M.%S', t) + f'.{ts % 997 * 1000:06d}'
    return f'{tag} {ts} {date} {node} {full} {node} RAS'
  clock = time.strftime('%H:%M:%S', t)
  return (f'{tag} {ts} {date} {node} {_MONTHS[t.tm_mon - 1]} {t.tm_mday} '
          f'{clock} {node}/{node}')


def _node(system: str, rng: random.Random) -> str:
  if system == 'BGL':
    return (f'R{rng.randrange(64):02d}-M{rng.randrange(2)}'
            f'-N{rng.randrange(16):X}-C:J{rng.randrange(2, 19):02d}'
            f'-U{rng.choice((1, 11)):02d}')
  prefix = 'sn' if system == 'Spirit' else 'dn'
  return f'{prefix}{rng.randrange(1, 1024)}'


def synthetic_lines(system: str, num_lines: int, seed: int, block: int = 50,
                    anomaly_rate: float = 0.3) -> Iterator[str]:
  """Raw LogHub-format lines (no newline) of one synthetic system.

  Args:
    system: 'BGL' | 'Thunderbird' | 'Spirit'.
    num_lines: how many lines.
    seed: the same seed gives the same lines.
    block: lines per block (the window size, for windows aligned to blocks).
    anomaly_rate: fraction of anomalous blocks.

  Yields:
    Lines in the same format as the real `<system>*.log` files.
  """
  if system not in SYSTEMS:
    raise ValueError(f'unknown synthetic system {system!r}; '
                     f'choose from {sorted(SYSTEMS)}')
  spec = SYSTEMS[system]
  rng = random.Random(f'{VERSION}/{system}/{seed}')
  ts = _START[system]
  n_blocks = -(-num_lines // block)
  anomalous = set(rng.sample(range(n_blocks), round(anomaly_rate * n_blocks)))
  for start in range(0, num_lines, block):
    size = min(block, num_lines - start)
    bad = set()
    if start // block in anomalous:
      bad = set(rng.sample(range(size), min(size, rng.randint(1, 3))))
    for i in range(size):
      ts += rng.randrange(3)
      node = _node(system, rng)
      if i in bad:
        tag, template = rng.choice(spec['anomalous'])
      else:
        tag, template = '-', rng.choice(spec['normal'])
      yield f'{_header(system, tag, ts, node)} {_fill(template, rng)}'


def write_synthetic_log(path: str | pathlib.Path, system: str, num_lines: int,
                        seed: int, block: int = 50,
                        anomaly_rate: float = 0.3) -> pathlib.Path:
  """Writes `num_lines` synthetic lines to `path` ('\\n' endings)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for line in synthetic_lines(system, num_lines, seed, block, anomaly_rate):
      f.write(line + '\n')
  return path
