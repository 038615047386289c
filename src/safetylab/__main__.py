from safetylab.cli import main

main()
