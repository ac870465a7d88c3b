from queueservice_server.cli import main

main()
