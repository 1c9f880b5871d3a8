"""Start one JAX job as several processes on this machine (CPU, loopback).

What a multi-host cluster does with one process per host, on one machine: N
copies of a script, each with its own simulated CPU devices, talking over
127.0.0.1. Every copy gets ``--multi-host --coordinator 127.0.0.1:PORT
--num-processes N --process-id I`` appended to its arguments (the script calls
``jax.distributed.initialize`` with them; process 0 hosts the coordinator) and
runs with ``JAX_PLATFORMS=cpu`` and ``devices_per_process`` simulated devices.

Nothing here can hang: the port is a free loopback port chosen now, the whole
job has a deadline, and as soon as one process fails the others are killed
(they would otherwise wait in a collective for a peer that is gone). Used by
``sharded_training.py --processes N``; also usable on its own::

  python examples/local_processes.py --processes 2 -- \\
      examples/sharded_training.py --steps 8 --check
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import time

# The coordinator listens on this address only: nothing leaves the machine.
LOOPBACK = "127.0.0.1"


def free_loopback_port():
  """A TCP port on 127.0.0.1 that was free a moment ago (the OS's choice)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind((LOOPBACK, 0))
    return sock.getsockname()[1]


def worker_env(devices_per_process):
  """The environment of every process: CPU only, its own simulated devices."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "",
                 os.environ.get("XLA_FLAGS", ""))
  return {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": (f"{flags} --xla_force_host_platform_device_count="
                    f"{devices_per_process}").strip(),
      # Unbuffered, so that what a killed process printed is not lost.
      "PYTHONUNBUFFERED": "1",
  }


def run(script_args, num_processes, *, devices_per_process=2, timeout=600.0):
  """Runs ``python script_args...`` as ``num_processes`` processes of one job.

  Args:
    script_args: the script and its arguments; the coordinates are appended.
    num_processes: how many processes (simulated hosts).
    devices_per_process: simulated CPU devices in each process.
    timeout: seconds for the whole job; then every process is killed.

  Returns:
    0 if every process exited with 0; otherwise the first failure's exit
    status (128 + the signal if it was killed), or 124 on timeout.
  """
  if num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
  address = f"{LOOPBACK}:{free_loopback_port()}"
  env = worker_env(devices_per_process)
  procs = []
  try:
    for process_id in range(num_processes):
      procs.append(subprocess.Popen(
          [sys.executable, *script_args, "--multi-host",
           "--coordinator", address, "--num-processes", str(num_processes),
           "--process-id", str(process_id)], env=env))
    deadline = time.monotonic() + timeout
    while True:
      codes = [proc.poll() for proc in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        process_id, code = failed[0]
        print(f"local_processes: process {process_id} exited with {code}; "
              "stopping the others", file=sys.stderr, flush=True)
        return code if code > 0 else 128 - code
      if all(code == 0 for code in codes):
        return 0
      if time.monotonic() > deadline:
        print(f"local_processes: no result after {timeout:g} s; stopping "
              "all processes", file=sys.stderr, flush=True)
        return 124
      time.sleep(0.1)
  finally:
    for proc in procs:  # only the processes started above
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      usage="%(prog)s [--processes N] [...] -- SCRIPT [ARGS...]")
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices-per-process", type=int, default=2)
  parser.add_argument("--timeout", type=float, default=600.0,
                      help="seconds for the whole job")
  parser.add_argument("script_args", nargs=argparse.REMAINDER)
  args = parser.parse_args()
  script_args = args.script_args
  if script_args[:1] == ["--"]:
    script_args = script_args[1:]
  if not script_args:
    parser.error("give the script to run after --")
  sys.exit(run(script_args, args.processes,
               devices_per_process=args.devices_per_process,
               timeout=args.timeout))


if __name__ == "__main__":
  main()
