shardq bench idle --connections 100 --duration-s 30 --server 127.0.0.1:PORT --server-pid PID --json w3.json --plot w3.svg
