from bellaq.mock_upstream.server import main

main()
